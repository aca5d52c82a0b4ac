"""A qtoy model under nnsight's generic wrapper: read and edit `blocks[i].attn` outputs in a trace,
checked against qtoy's own hooks."""

import pytest
import torch

from qtoy_core import build_model

nnsight = pytest.importorskip("nnsight", reason="nnsight is a test extra (pip install 'qtoy[test]')")


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("transformer_2L", attn="quadratic", mlp="bilinear", d_model=32, n_head=2, vocab_size=50, n_ctx=16)
    for p in m.parameters():  # out_proj starts at zero: give every block something to say
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def test_nnsight_reads_attention_outputs_as_qtoys_cache_does(model):
    tokens = torch.randint(0, 50, (2, 10))
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(tokens):
        attn_out = wrapped.blocks[1].attn.output.save()
        logits = wrapped.output.save()
    # only hook_attn_out: recording patterns would switch attention to its explicit (T, T) form
    ref_logits, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_out")
    torch.testing.assert_close(attn_out.detach(), cache["blocks.1.hook_attn_out"])
    torch.testing.assert_close(logits.detach(), ref_logits)


def test_nnsight_edits_attention_outputs_as_a_forward_hook_does(model):
    tokens = torch.randint(0, 50, (2, 10))
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(tokens):
        wrapped.blocks[0].attn.output[:, -1] = 0  # ablate layer 0's attention at the last position
        edited = wrapped.output.save()
    handle = model.blocks[0].attn.register_forward_hook(lambda mod, args, out: out.index_fill(1, torch.tensor([9]), 0))
    try:
        with torch.no_grad():
            expected = model(tokens)
    finally:
        handle.remove()
    torch.testing.assert_close(edited.detach(), expected)
    with torch.no_grad():
        assert not torch.allclose(expected, model(tokens))  # the edit changed the output
