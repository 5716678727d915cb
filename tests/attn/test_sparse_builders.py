"""Each block-sparse builder against the definition its docstring gives."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import bigbird, from_mask_fn, longformer, strided


def block_of(mask: torch.Tensor, bs: int) -> torch.Tensor:
    """Block-level any() of an element mask [..., n, n]."""
    n = mask.shape[-1]
    nb = math.ceil(n / bs)
    pad = nb * bs - n
    m = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    return m.reshape(*m.shape[:-2], nb, bs, nb, bs).any(-1).any(-2)


@pytest.mark.parametrize(("n", "window", "glob"), [(100, 10, 2), (64, 0, 0), (130, 31, [5, 77])])
def test_longformer_definition(n, window, glob):
    p = longformer(n, 16, window, glob)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    g = torch.zeros(n, dtype=torch.bool)
    g[torch.arange(glob) if isinstance(glob, int) else torch.tensor(glob)] = True
    expected = ((i - j).abs() <= window // 2) | g[:, None] | g[None, :]
    assert torch.equal(p.dense_mask(n, n)[0], expected)
    assert torch.equal(p.layout[0, 0], block_of(expected, 16))
    assert p.visited_pairs(n, n) == int(expected.sum())


def test_longformer_causal():
    p = longformer(80, 16, 12, 1, causal=True)
    i, j = torch.arange(80)[:, None], torch.arange(80)[None, :]
    expected = (((i - j).abs() <= 6) | (i == 0) | (j == 0)) & (j <= i)
    assert torch.equal(p.dense_mask(80, 80)[0], expected)


def test_bigbird_definition_and_reproducibility():
    n, bs = 320, 32
    p = bigbird(n, bs, num_window_blocks=3, num_global_blocks=2, num_random_blocks=2, seed=7,
                num_heads=3)
    nb = 10
    lay = p.layout[0]  # [H, nb, nb]
    assert lay.shape == (3, nb, nb)
    r, c = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    glob = torch.zeros(nb, dtype=torch.bool)
    glob[[0, nb - 1]] = True
    base = ((r - c).abs() <= 1) | glob[:, None] | glob[None, :]
    for h in range(3):
        assert (lay[h] | ~base).all(), "window and global blocks must be present"
        extra = lay[h] & ~base
        for row in range(nb):  # exactly num_random_blocks random blocks in every non-global row
            assert int(extra[row].sum()) == (0 if glob[row] else 2)
    again = bigbird(n, bs, 3, 2, 2, seed=7, num_heads=3)
    other = bigbird(n, bs, 3, 2, 2, seed=8, num_heads=3)
    assert torch.equal(again.layout, p.layout)
    assert not torch.equal(other.layout, p.layout)
    assert not torch.equal(lay[0], lay[1]), "heads draw their own random blocks"
    # density ~ (w + 2g + r) / nb of the blocks
    assert float(lay.float().mean()) <= (3 + 2 * 2 + 2) / nb


@pytest.mark.parametrize("causal", [True, False])
def test_strided_definition(causal):
    n, bs, local, stride = 200, 16, 2, 3
    p = strided(n, bs, local, stride, causal=causal)
    nb = 13
    d = torch.arange(nb)[:, None] - torch.arange(nb)[None, :]
    if causal:
        expected = (d >= 0) & ((d < local) | (d % stride == 0))
    else:
        expected = (d.abs() < local) | (d.abs() % stride == 0)
    assert torch.equal(p.layout[0, 0], expected)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    elem = expected[i // bs, j // bs] & ((j <= i) if causal else True)
    assert torch.equal(p.dense_mask(n, n)[0], elem)


def test_from_mask_fn_definition_with_ragged_edges():
    n_q, n_k, bs = 50, 70, 16

    def fn(i, j):
        return ((i * 7 + j * 3) % 5 == 0) | (j == i)

    p = from_mask_fn(fn, n_q, n_k, bs)
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    assert torch.equal(p.dense_mask(n_q, n_k)[0], fn(i, j))
    assert p.visited_pairs(n_q, n_k) == int(fn(i, j).sum())


def test_builder_argument_errors():
    with pytest.raises(TypeError, match=r"fn must return a bool tensor"):
        from_mask_fn(lambda i, j: i - j, 32, 32, 16)
    with pytest.raises(TypeError, match=r"fn must be callable"):
        from_mask_fn("causal", 32, 32, 16)
    with pytest.raises(ValueError, match=r"block_size must be >= 16, got 8"):
        bigbird(64, 8)
    with pytest.raises(ValueError, match=r"global_tokens must be in \[0, n = 10\], got 11"):
        longformer(10, 16, 4, 11)
    with pytest.raises(ValueError, match=r"stride must be >= 1, got 0"):
        strided(64, 16, 1, 0)


def test_visited_pairs_is_per_head_like_the_band_patterns():
    from attnkit import BlockSparse

    n, bs = 64, 16
    layout = torch.zeros(2, 4, 4, dtype=torch.bool)
    layout[0] = True  # head 0 dense, head 1 empty
    p = BlockSparse(layout, bs)
    assert p.visited_pairs(n, n) == n * n / 2
    assert BlockSparse(layout[:1], bs).visited_pairs(n, n) == n * n
