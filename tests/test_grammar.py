"""The built-in corpus and its exact well-formedness check."""

import dlm_common as dlm


def test_every_generated_sentence_is_well_formed():
    corpus = dlm.builtin_corpus(2000, seed=7)
    assert all(dlm.is_well_formed(s) for s in corpus)
    assert len(set(corpus)) > 1800, "the corpus should be varied"


def test_agreement_and_form_violations_are_rejected():
    good = ["The cats near the dog run.", "A farmer that sees the kings sleeps today.", "Some girls like this boy."]
    bad = [
        "The cats near the dog runs.",  # verb agrees with the attractor, not the subject
        "A farmer that see the kings sleeps.",  # relative-clause verb disagrees
        "These cat runs.",  # determiner disagrees
        "The cat runs",  # no full stop
        "the cat runs.",  # no capital
        "The cat runs runs.",
        "The near cat runs.",
        "The cat  runs.",
        "",
    ]
    assert all(dlm.is_well_formed(s) for s in good)
    assert not any(dlm.is_well_formed(s) for s in bad)


def test_prompts_constrain_the_verb():
    """Each prompt is a subject; exactly one of the singular and plural verb completes it."""
    for prompt in dlm.agreement_prompts(100):
        assert not dlm.is_well_formed(prompt + ".")
        assert dlm.is_well_formed(prompt + " runs.") != dlm.is_well_formed(prompt + " run.")
