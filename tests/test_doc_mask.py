"""Document masking (`ModelConfig.doc_mask`, `doc_ids=`): a packed row of documents computes exactly
what each document computes alone, outputs and gradients (float64), in every attention and kernel
path, in generation with the recurrent state or a KV cache, and in the tensor network; components
without the capability, and rows without boundaries, are refused."""

import json
import types
from typing import Literal

import pytest
import torch

import qtoy_core
import qtoy_core.ops.quadratic as qa
from qtoy_core import (AttentionConfig, ProjectedAttention, build_model, causal_pattern, document_ids, hookimpl,
                       quadratic_attention)
from qtoy_core.analysis.tensor_network import contract_logits, to_tensor_network
from qtoy_core.documents import DocMaskError
from qtoy_core.generate import generate
from qtoy_core.training.config import assemble_run_config

from helpers.in_process import FAST, qtoy

SEP, BOS, VOCAB = 1, 2, 40
LENGTHS = (6, 11, 5)  # unequal; with chunk 4 the boundaries fall inside chunks and on a chunk edge
REL = 1e-10


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def documents(seed=0, lengths=LENGTHS):
    """Documents as the packer writes them, ``[bos] ids sep``, and the packed row."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([BOS]), torch.randint(3, VOCAB, (n - 2,), generator=g), torch.tensor([SEP])])
            for n in lengths]
    return docs, torch.cat(docs)[None]


def model(attn, pos="rope", model_type="transformer_2L", **options):
    torch.manual_seed(0)
    m = build_model(model_type, attn=attn, pos=pos, mlp="bilinear" if "transformer" in model_type else "none",
                    vocab_size=VOCAB, d_model=16, n_head=2, n_ctx=32, doc_mask=True, doc_separator_id=SEP,
                    doc_bos_id=BOS, **options).double()
    with torch.no_grad():  # away from the zero init of the residual writers: every path carries signal
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def outputs_and_grads(m, rows):
    """Logits of each row (concatenated along time) and the gradient of a fixed functional of them."""
    m.zero_grad()
    logits = torch.cat([m(r) for r in rows], 1)
    weight = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_packed_equals_separate(m):
    docs, row = documents()
    packed, g_packed = outputs_and_grads(m, [row])
    alone, g_alone = outputs_and_grads(m, [d[None] for d in docs])
    assert rel_err(packed, alone) < REL
    for name in g_alone:
        assert rel_err(g_packed[name], g_alone[name]) < REL, name


CASES = [(a, impl) for a in ("quadratic", "bilinear") for impl in ("plain", "chunked", "autograd", "explicit")]
CASES += [("softmax", None), ("softmax", "explicit")]


@pytest.mark.parametrize("attn, impl", CASES)
def test_packed_row_equals_each_document_alone(attn, impl, monkeypatch):
    cfg = {"name": attn} if impl in (None, "explicit") else {"name": attn, "impl": impl}
    m = model(cfg)
    if impl == "chunked":  # chunks of 4: boundaries inside chunks and on a chunk edge (6 + 11 + 5)
        monkeypatch.setattr(qa, "DEFAULT_CHUNK_SIZE", 4)
    patterns = []
    if impl == "explicit":  # a hook on the pattern: the explicit path, and what the hook sees
        for block in m.blocks:
            block.attn.hook_pattern.register_forward_hook(lambda mod, inp, out: patterns.append(out.detach()))
    assert_packed_equals_separate(m)
    if impl == "explicit":
        docs = document_ids(documents()[1], SEP, BOS)[0]
        across = docs[:, None] != docs[None, :]
        packed = patterns[:len(m.blocks)]  # the packed row's forward came first
        assert all(p.shape[-1] == docs.numel() and bool((p[..., across] == 0).all()) for p in packed)
        assert all(bool((p[..., ~across].abs().sum() > 0)) for p in packed)


@pytest.mark.parametrize("pos", ["learned", "none"])
@pytest.mark.parametrize("attn", ["quadratic", "bilinear", "softmax"])
def test_every_positional_places_documents_alone(attn, pos):
    assert_packed_equals_separate(model(attn, pos=pos))


def test_learned_positions_restart_at_each_document():
    m = model("quadratic", pos="learned")
    docs, row = documents()
    _, cache = m.run_with_cache(row, names_filter="hook_pos_embed")
    within = torch.cat([torch.arange(len(d)) for d in docs])
    assert torch.equal(cache["hook_pos_embed"][0], m.positional.W_pos.detach()[within])


def test_without_doc_mask_documents_do_interact():
    """The control: the same packed row without masking differs from the documents alone."""
    m = model("quadratic")
    m.config.doc_mask = False
    docs, row = documents()
    with torch.no_grad():
        assert rel_err(m(row), torch.cat([m(d[None]) for d in docs], 1)) > 1e-3
        masked = m(row, doc_ids=document_ids(row, SEP, BOS))  # explicit ids apply the mask anyway
        assert rel_err(masked, torch.cat([m(d[None]) for d in docs], 1)) < REL


@pytest.mark.parametrize("d_bilinear", [False, True])
@pytest.mark.parametrize("chunk, group, prefix", [(3, 1, 0), (3, 2, 5), (4, 3, 11), (2, 5, 0), (64, None, 7)])
def test_chunked_kernel_carries_the_open_document(d_bilinear, chunk, group, prefix):
    """Two rows with different boundaries, queries after a state-only prefix, several groups."""
    torch.manual_seed(1)
    T = sum(LENGTHS)
    xs = [torch.randn(2, 2, T, 4, dtype=torch.float64, requires_grad=True) for _ in range(5 if d_bilinear else 3)]
    doc = torch.stack([document_ids(documents()[1], SEP, BOS)[0], torch.tensor([0] * 3 + [1] * 9 + [2] * 1 + [3] * 9)])
    q, k, v, *qk2 = xs
    q2, k2 = qk2 if qk2 else (None, None)
    cut = lambda x: None if x is None else x[:, :, prefix:]  # noqa: E731
    ref = quadratic_attention(cut(q), k, v, scale=0.3, q2=cut(q2), k2=k2, impl="autograd", doc_ids=doc)
    z, _ = qa._chunked(cut(q), k, v, 0.3, cut(q2), k2, chunk, doc=doc, group_chunks=group)
    assert rel_err(z, ref) < REL
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(z, xs, g), torch.autograd.grad(ref, xs, g)):
        assert rel_err(a, b) < REL


@pytest.mark.parametrize("attn", ["quadratic", "bilinear", {"name": "quadratic", "impl": "chunked"}, "softmax"])
@pytest.mark.parametrize("mode", ["recurrent", "kv"])
def test_generation_across_a_boundary_equals_documents_alone(attn, mode):
    """A prompt ending inside the second document, then token by token across the next boundary."""
    m = model(attn, pos="learned")
    docs, row = documents()
    with torch.no_grad():
        alone = torch.cat([m(d[None]) for d in docs], 1)
        cache = m.new_cache(mode)
        steps = [m(row[:, :9], cache=cache)] + [m(row[:, t:t + 1], cache=cache) for t in range(9, row.shape[1])]
    assert rel_err(torch.cat(steps, 1), alone) < REL
    if mode == "recurrent" and attn != "softmax":
        assert "rnn" in cache.layers[0] and "k" not in cache.layers[0]  # the constant-size state ran


def test_recurrent_state_resets_only_the_rows_that_start_a_document():
    m = model("quadratic", model_type="attention_only_1L")
    docs, row = documents()
    other = torch.cat([docs[1], docs[0], docs[2]])[None]  # boundaries elsewhere
    rows = torch.cat([row, other])
    with torch.no_grad():
        cache = m.new_cache("recurrent")
        steps = torch.cat([m(rows[:, :3], cache=cache)] + [m(rows[:, t:t + 1], cache=cache)
                                                            for t in range(3, rows.shape[1])], 1)
        assert rel_err(steps, m(rows)) < REL


def test_generate_continues_past_a_separator_as_a_new_document():
    m = model("quadratic", pos="learned")
    docs, _ = documents()
    prompt = torch.cat([docs[0], docs[1][:3]])[None]
    out = generate(m, prompt, 4, temperature=0)
    fresh = generate(m, docs[1][:3][None], 4, temperature=0)
    assert torch.equal(out[:, len(docs[0]):], fresh)


def test_tensor_network_sums_keys_of_the_query_document_only():
    m = model("quadratic", model_type="transformer_1L", pos="learned")
    docs, row = documents(lengths=(3, 2, 3))
    doc_ids = document_ids(row, SEP, BOS)[0]
    tn = to_tensor_network(m, row.shape[1], doc_ids=doc_ids)
    with torch.no_grad():
        ref = torch.cat([m(d[None]) for d in docs], 1)
    assert rel_err(contract_logits(tn, row), ref) < 1e-9
    with pytest.raises(ValueError, match="nondecreasing"):
        to_tensor_network(m, 4, doc_ids=[0, 1, 0, 1])


def test_document_ids_follow_the_packer():
    t = torch.tensor([[BOS, 5, SEP, BOS, 6, 7, SEP, BOS], [7, SEP, BOS, 5, SEP, BOS, 6, SEP]])
    assert document_ids(t, SEP, BOS).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 2, 2, 2]]
    assert document_ids(torch.tensor([[5, SEP, 6, SEP, 7]]), SEP).tolist() == [[0, 0, 1, 1, 2]]
    # bos is the separator (a tokenizer without eos): documents are `bos ids bos`
    assert document_ids(torch.tensor([[BOS, 5, BOS, BOS, 6, BOS, BOS]]), BOS, BOS).tolist() == [[0, 0, 0, 1, 1, 1, 2]]


class _NoDocMaskConfig(AttentionConfig):
    """Quadratic attention written without the document-masking capability (test plugin)."""

    name: Literal["no_doc_mask_test"] = "no_doc_mask_test"


class _NoDocMaskAttention(ProjectedAttention):
    def mix(self, q, k, v, key_mask, state, **_):
        return causal_pattern((q @ k.transpose(-1, -2)) ** 2, key_mask) @ v


@pytest.fixture
def plugin_without_capability():
    registry = qtoy_core.get_registry()
    name = registry.add_plugin(types.SimpleNamespace(register_attentions=hookimpl(
        lambda register: register(_NoDocMaskConfig, _NoDocMaskAttention))), name="doc-mask-test-plugin")
    try:
        yield
    finally:
        registry.remove_plugin(name)


def test_attention_without_the_capability_is_refused(plugin_without_capability):
    with pytest.raises(DocMaskError, match=r"attention 'no_doc_mask_test'.*supports_doc_mask = True"):
        build_model("attention_only_1L", attn="no_doc_mask_test", vocab_size=VOCAB, d_model=16, doc_mask=True,
                    doc_separator_id=SEP)
    m = build_model("attention_only_1L", attn="no_doc_mask_test", vocab_size=VOCAB, d_model=16)
    with pytest.raises(DocMaskError, match="does not support it"):  # asked for through the forward too
        m(documents()[1], doc_ids=torch.zeros(1, sum(LENGTHS), dtype=torch.long))


def test_bad_doc_ids_and_a_missing_separator_are_refused():
    m = model("quadratic")
    row = documents()[1]
    with pytest.raises(DocMaskError, match="nondecreasing"):
        m(row[:, :3], doc_ids=torch.tensor([[0, 1, 0]]))
    with pytest.raises(DocMaskError, match="shaped like the tokens"):
        m(row[:, :3], doc_ids=torch.tensor([[0, 1]]))
    m.config.doc_separator_id = None
    with pytest.raises(DocMaskError, match="doc_separator_id"):
        m(row)


def test_doc_mask_without_packed_rows_is_refused():
    with pytest.raises(ValueError, match="doc_mask.*'padded'.*Drop --doc-mask"):
        assemble_run_config({"data": {"mode": "padded"}}, {"doc_mask": True})
    code, out = qtoy("train", "--doc-mask", "--set", "data.mode=padded", "--max-iters", "1", "--quiet")
    assert code != 0 and "no boundary to mask" in out and "Traceback" not in out


def test_cli_trains_with_doc_mask_and_records_it(tmp_path):
    run = tmp_path / "run"
    code, out = qtoy("train", "--doc-mask", *FAST, "--max-iters", "4", "--out", run)
    assert code == 0, out
    model, tokenizer, document = qtoy_core.load_run(run)
    recorded = document["model"]
    assert recorded["doc_mask"] is True
    assert (recorded["doc_separator_id"], recorded["doc_bos_id"]) == (tokenizer.separator_id, tokenizer.bos_id)
    assert model.config.doc_mask  # what eval and the analyses load: the same documents are masked
    rows = torch.tensor([tokenizer.encode("a b") + [tokenizer.separator_id] + tokenizer.encode("c d e")])
    with torch.no_grad():
        derived = model(rows)
        given = model(rows, doc_ids=document_ids(rows, tokenizer.separator_id, tokenizer.bos_id))
    assert torch.equal(derived, given)
    code, out = qtoy("eval", run, "--eval-iters", "1", "--json")
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["loss"] > 0
