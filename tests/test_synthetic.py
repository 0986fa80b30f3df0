import random

from prefkit import synthetic
from prefkit.synthetic import ReviewGrammar, oracle_reward


def test_oracle_reward_by_hand():
    assert oracle_reward("the plot was great .") == 2.0
    assert oracle_reward("the plot was not great .") == -2.0  # negation flips the next sentiment word
    assert oracle_reward("the plot was very good .") == 1.5  # intensifier scales it
    assert oracle_reward("the plot was not very good .") == -1.5
    assert oracle_reward("i did not hate the cast .") == 2.0
    # negation ends at a clause boundary: "not" does not reach past "but"
    assert oracle_reward("the plot was not bad but the ending was dull .") == 1.0 - 1.0
    assert oracle_reward("the plot was long .") == 0.0
    assert oracle_reward("") == 0.0


def test_generation_is_seeded_and_splits_are_disjoint():
    a = synthetic.sft_examples(50, 0, "train")
    assert a == synthetic.sft_examples(50, 0, "train")
    assert a != synthetic.sft_examples(50, 1, "train")
    train = {r["prompt"] + r["completion"] for r in synthetic.sft_examples(300, 0, "train")}
    held_out = {r["prompt"] + r["completion"] for r in synthetic.sft_examples(300, 0, "eval")}
    assert len(train & held_out) < 5  # only chance collisions of short reviews


def test_words_are_in_the_lexicon_and_prompts_are_prefixes():
    words = set(synthetic.lexicon())
    for row in synthetic.sft_examples(200, 3, "train"):
        text = f"{row['prompt']} {row['completion']}"
        assert set(text.split()) <= words
        assert 2 <= len(row["prompt"].split()) <= 4


def test_completions_continue_their_prompt():
    grammar, rng = ReviewGrammar(), random.Random(0)
    for _ in range(100):
        review = grammar.sample(rng)
        completion = grammar.complete(rng, review.prompt)
        assert completion and set(completion.split()) <= set(synthetic.lexicon())


def test_preference_rows_are_sorted_best_first_and_never_tied():
    rows = synthetic.preference_examples(100, 0, "train", group_size=3)
    for row in rows:
        assert row["rewards"] == sorted(row["rewards"], reverse=True)
        assert row["rewards"][0] > row["rewards"][-1]
        assert row["rewards"] == [oracle_reward(f"{row['prompt']} {c}") for c in row["completions"]]


def test_corpus_spans_both_sentiments():
    rewards = [oracle_reward(f"{r['prompt']} {r['completion']}") for r in synthetic.sft_examples(2000, 0, "train")]
    mean = sum(rewards) / len(rewards)
    assert abs(mean) < 0.5
    assert min(rewards) < -4 and max(rewards) > 4
