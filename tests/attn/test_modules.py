"""MultiheadSelfAttention and RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from attnkit import MultiheadSelfAttention, RotaryEmbedding, SlidingWindow
from attnkit.kernels.flash.naive import attention_naive as attention_oracle
from tests.conftest import DEVICE


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_matches_manual_computation(backend):
    torch.manual_seed(1)
    B, N, E, H, Hkv = 2, 19, 64, 4, 2
    block = MultiheadSelfAttention(E, H, Hkv, pattern=SlidingWindow(6), rotary=True, bias=True,
                                   backend=backend).to(DEVICE)
    x = torch.randn(B, N, E, device=DEVICE, requires_grad=True)
    kpm = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    kpm[1, :4] = False  # left padding
    y = block(x, valid_keys=kpm)
    assert y.shape == (B, N, E) and torch.isfinite(y).all()

    D = E // H
    q = block.q_proj(x).view(B, N, H, D).transpose(1, 2)
    k = block.k_proj(x).view(B, N, Hkv, D).transpose(1, 2)
    v = block.v_proj(x).view(B, N, Hkv, D).transpose(1, 2)
    q, k = block.rotary(q), block.rotary(k)
    o, _ = attention_oracle(q, k, v, SlidingWindow(6), valid_keys=kpm)
    ref = block.o_proj(o.transpose(1, 2).reshape(B, N, E).float())
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)

    y.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_rotary_encodes_relative_positions_and_keeps_norms():
    rope = RotaryEmbedding(32)
    q = torch.randn(1, 1, 1, 32).expand(1, 1, 12, 32)
    k = torch.randn(1, 1, 1, 32).expand(1, 1, 12, 32)
    rq, rk = rope(q), rope(k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    dots = rq[0, 0] @ rk[0, 0].T  # [12, 12]: depends on i - j only
    for off in range(-3, 4):
        diag = torch.diagonal(dots, offset=off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-4, rtol=1e-4)
    # explicit position ids shift every angle alike
    pos = torch.arange(12) + 5
    torch.testing.assert_close(rope(q, pos)[0, 0] @ rope(k, pos)[0, 0].T, dots, atol=1e-4,
                               rtol=1e-4)


def test_constructor_errors():
    msg = r"num_heads \(6\) must be a positive multiple of num_kv_heads \(4\)"
    with pytest.raises(ValueError, match=msg):
        MultiheadSelfAttention(48, 6, 4)
    with pytest.raises(ValueError, match=r"embed_dim \(50\) is not divisible by num_heads \(4\)"):
        MultiheadSelfAttention(50, 4)
    with pytest.raises(ValueError, match=r"head_dim must be even, got 7"):
        RotaryEmbedding(7)
    block = MultiheadSelfAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, N, 32\], got shape \(2, 5, 16\)"):
        block(torch.randn(2, 5, 16))


def test_block_refuses_pytorch_key_padding_mask_and_takes_valid_keys_by_keyword_only():
    block = MultiheadSelfAttention(32, 4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(TypeError, match=r"MultiheadSelfAttention.forward: key_padding_mask is not "
                                        r"accepted.*valid_keys"):
        block(x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError):  # a positional mask could carry either convention
        block(x, torch.ones(1, 5, dtype=torch.bool))
