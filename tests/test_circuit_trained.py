"""A circuit, tested on planted truth: the induction head of a 2-layer quadratic model trained on
`synthetic` (issue 13, part 5; docs/analysis.md "A circuit, tested"; examples/04).

The model under tests/fixtures/induction_2L is the final checkpoint of the documented command (its
config.json records the run; tests/fixtures/induction_2L/README.md has the command). Training it
takes minutes, so the suite reads the checkpoint and tests the *readings*: the weight-based
analysis, the behaviour detectors, ablation against the generator's labels, activation patching
and the exact attribution must all name the same circuit. The notebook trains it from scratch.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from qtoy_core.analysis import head_detectors, induction_heads
from qtoy_core.analysis.ablation import Head, ablate
from qtoy_core.analysis.attribution import logit_attribution, top_paths
from qtoy_core.analysis.patching import activation_patching
from qtoy_core.model import ToyTransformer
from qtoy_core.run_files import load_run_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "induction_2L"
N_STORIES = 16   # validation stories scored per label (~4,000 labelled tokens)


@pytest.fixture(scope="module")
def trained():
    model = ToyTransformer.from_pretrained(FIXTURE).eval()
    _, dataset = load_run_dataset(FIXTURE, require_record=True)
    return model, dataset, dataset.tokenizer()


@pytest.fixture(scope="module")
def induction_head(trained):
    """(layer, head) of the behaviour detectors' best induction head in a layer that can compose."""
    model, _, _ = trained
    det = head_detectors(model)
    layer, head = next((l, h) for l, h, _ in det.top("induction", n=det.scores["induction"].numel()) if l >= 1)
    return layer, head, det


def _labelled_stories(dataset, tokenizer, n_ctx: int):
    out = []
    for text in itertools.islice(dataset.documents("validation"), N_STORIES):
        truth = dataset.ground_truth(text)
        ids = ([tokenizer.separator_id] + truth["ids"])[:n_ctx]
        labels = (["fixed"] + truth["labels"])[:n_ctx]
        out.append((torch.tensor([ids]), labels))
    return out


def _loss_by_label(model, stories, targets=()):
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for tokens, labels in stories:
        logits = ablate(model, tokens, list(targets)) if targets else model(tokens).detach()
        nll = -logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
        for label, value in zip(labels[1:], nll.tolist()):
            totals[label] = totals.get(label, 0.0) + value
            counts[label] = counts.get(label, 0) + 1
    return {label: totals[label] / counts[label] for label in totals}


def _validation_rows(dataset, tokenizer, n_ctx: int, n: int = 16) -> torch.Tensor:
    rows = []
    for text in dataset.documents("validation"):
        ids = [tokenizer.separator_id] + tokenizer.encode(text)
        if len(ids) >= n_ctx:
            rows.append(ids[:n_ctx])
        if len(rows) == n:
            return torch.tensor(rows)
    raise AssertionError("too few long validation stories")


def test_weights_and_behaviour_name_the_same_induction_head(trained, induction_head):
    model, dataset, tokenizer = trained
    layer, head, det = induction_head
    best = induction_heads(model, top=1)[0]  # the strongest K-composition pair, with the later head's copying
    assert (best.layer_to, best.head_to) == (layer, head)
    assert best.score > 1.5 * best.baseline and best.copying_score_to > 0.5
    # on the corpus' own text the same detector (targets: the token after an earlier copy of the
    # current one) picks the same head, well above a pattern spread evenly over the keys
    text = head_detectors(model, tokens=_validation_rows(dataset, tokenizer, model.config.n_ctx))
    scores = text.scores["induction"][layer]
    assert int(scores.argmax()) == head
    assert scores[head] > 2 * text.uniform["induction"][layer, head]
    assert scores[head] > 1.5 * torch.cat([scores[:head], scores[head + 1:]]).max()
    # and its K-composition partner is one of the two layer-0 heads that attend most to the previous token
    assert best.head_from in text.scores["previous_token"][0].topk(2).indices.tolist()


def test_ablating_the_induction_head_hurts_copyable_tokens_not_fixed_ones(trained, induction_head):
    model, dataset, tokenizer = trained
    layer, head, _ = induction_head
    stories = _labelled_stories(dataset, tokenizer, model.config.n_ctx)
    base = _loss_by_label(model, stories)
    ablated = _loss_by_label(model, stories, [Head(layer, head)])
    rise = {label: ablated[label] - base[label] for label in base}
    assert rise["copyable"] > 0.5                       # nats per copyable token
    assert rise["copyable"] > 10 * max(rise["fixed"], 0.01)
    assert rise["copyable"] > 5 * max(rise["free"], 0.01)


def _repeated_name_prompts(dataset, tokenizer):
    """A made-up name introduced, then the first token of its second occurrence (clean), and the
    same prompt with a different name of the same token length first (corrupted)."""
    def pieces(name):
        return tokenizer.encode(" " + name)

    names = {}
    for i in range(200):
        for name, _ in dataset.story(10_000 + i).characters:
            names.setdefault(len(pieces(name)), []).append(name)
    size = max((n for n in names if n >= 3), key=lambda n: len(names[n]))
    clean_name, other = next((a, b) for a, b in itertools.combinations(names[size], 2)
                             if pieces(a)[0] != pieces(b)[0] and pieces(a)[1] != pieces(b)[1])
    prefix = tokenizer.encode("Once upon a time, a little fox named")
    middle = tokenizer.encode(" lived in a den near the river. One morning,")

    def prompt(first):
        return torch.tensor([[tokenizer.separator_id] + prefix + pieces(first) + middle + pieces(clean_name)[:1]])

    first_pos = 1 + len(prefix)
    return prompt(clean_name), prompt(other), pieces(clean_name)[1], pieces(other)[1], first_pos


def test_patching_restores_the_answer_and_the_exact_attribution_names_the_induction_path(trained, induction_head):
    model, dataset, tokenizer = trained
    layer, head, det = induction_head
    clean, corrupted, answer, wrong, first_pos = _repeated_name_prompts(dataset, tokenizer)
    result = activation_patching(model, clean, corrupted, answer=answer, wrong=wrong, kinds=("resid_pre",))
    restored = result["resid_pre"].normalized()          # (layer, pos): 1 = the clean logit difference back
    # the induction head reads, as its key, the token after the name's first token: patching the
    # residual stream entering its layer there restores the answer; the first token itself does not
    assert restored[layer, first_pos + 1] > 0.7
    assert restored[layer, first_pos] < 0.3

    attr = logit_attribution(model, clean, target=answer, position=-1)
    torch.testing.assert_close(attr.parts.sum(0), attr.logits, rtol=1e-5, atol=1e-4)  # exact in float32
    assert attr.top(1)[0][0] == f"L{layer}H{head}"       # the head that writes most of the answer logit
    paths = [g for g in top_paths(model, clean, target=answer, position=-1, k=40, layers=[layer])
             if (g.layer, g.head) == (layer, head)]
    top = paths[0]                                       # the largest of the induction head's own paths
    assert top.value > 0
    # K-composition: the key comes (in at least one factor) from layer-0 heads that behave as
    # previous-token heads on the corpus' text (the two with the largest previous-token score)
    text = head_detectors(model, tokens=_validation_rows(dataset, tokenizer, model.config.n_ctx))
    previous = text.scores["previous_token"][0]
    sources = [int(s[3:]) for s in top.k if s.startswith("L0H")]
    assert sources and set(sources) <= set(previous.topk(2).indices.tolist()), (top.name, previous)
    assert all(previous[h] > 2 * text.uniform["previous_token"][0, h] for h in sources)
