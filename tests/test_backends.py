"""Each backend's D against an einsum written here, and its bypass against a layer running D."""

import string
import threading

import pytest
import tensorly as tl
import torch
from torch import nn

from plugin import CP, AdapterConfig, LowRank, Tucker
from plugin.backends import BlockDiag, BlockLowRank, Hadamard, RowCol
from plugin.config import mode_ranks

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "conv3d": lambda: nn.Conv3d(4, 5, (3, 3, 2)),
    "strided_reflect": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(6, 8, 5, padding=2),
}
INPUTS = {
    "linear": (3, 7, 12),
    "conv3x3": (2, 6, 9, 9),
    "conv1x1": (2, 6, 5, 5),
    "depthwise": (2, 6, 7, 7),
    "conv3d": (2, 4, 5, 5, 4),
    "strided_reflect": (2, 6, 9, 9),
    "conv1d": (2, 6, 11),
}


def filled(backend):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in backend.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return backend


def einsum_tucker(core, factors):
    letters = string.ascii_lowercase
    core_idx = letters[: core.ndim]
    out_idx = letters[13 : 13 + core.ndim]
    spec = ",".join([core_idx] + [o + c for o, c in zip(out_idx, core_idx)]) + "->" + out_idx
    return torch.einsum(spec, core, *factors)


def einsum_cp(weights, factors):
    letters = string.ascii_lowercase[: len(factors)]
    spec = "z," + ",".join(f"{i}z" for i in letters) + "->" + letters
    return torch.einsum(spec, weights, *factors)


@pytest.mark.parametrize("kind", LAYERS)
def test_lowrank_delta_is_up_times_down(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(LowRank(shape, rank=3))
    expected = torch.einsum("or,ri->oi", backend.lora_up, backend.lora_down).reshape(shape)
    torch.testing.assert_close(backend.delta(), expected)
    assert backend.lora_down.shape == (3, shape[1] * int(torch.tensor(shape[2:]).prod()))


@pytest.mark.parametrize("kind", LAYERS)
def test_tucker_delta_is_mode_products(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(Tucker(shape, rank=[4, 3, 2, 2]))
    assert backend.tucker_core.shape == tuple(mode_ranks([4, 3, 2, 2], shape))
    expected = einsum_tucker(backend.tucker_core, list(backend.tucker_factor))
    torch.testing.assert_close(backend.delta(), expected)


@pytest.mark.parametrize("kind", LAYERS)
def test_cp_delta_is_sum_of_outer_products(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(CP(shape, rank=5))
    expected = einsum_cp(backend.cp_weights, list(backend.cp_factor))
    torch.testing.assert_close(backend.delta(), expected)


@pytest.mark.parametrize("kind", LAYERS)
def test_hadamard_delta_is_the_product_of_two_lowrank_matrices(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(Hadamard(shape, rank=3))
    first = torch.einsum("or,ri->oi", backend.hada_w1_a, backend.hada_w1_b)
    second = torch.einsum("or,ri->oi", backend.hada_w2_a, backend.hada_w2_b)
    torch.testing.assert_close(backend.delta(), (first * second).reshape(shape))


@pytest.mark.parametrize("kind", LAYERS)
def test_blockdiag_delta_is_zero_off_the_diagonal_blocks(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(BlockDiag(shape, blocks=2))
    n = backend.blockdiag_blocks.shape[0]
    rows, cols = shape[0] // n, shape[1] // n
    expected = torch.zeros(shape)
    for b in range(n):
        expected[b * rows : (b + 1) * rows, b * cols : (b + 1) * cols] = backend.blockdiag_blocks[b]
    torch.testing.assert_close(backend.delta(), expected)
    assert n == (2 if shape[0] % 2 == 0 and shape[1] % 2 == 0 else 1)


@pytest.mark.parametrize("kind", LAYERS)
def test_blocklowrank_delta_is_a_grid_of_lowrank_blocks(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(BlockLowRank(shape, rank=4, blocks=2))
    n = backend.block_up.shape[0]
    rows, cols = shape[0] // n, shape[1] // n
    expected = torch.zeros(shape)
    for a in range(n):
        for b in range(n):
            block = (backend.block_up[a, b] @ backend.block_down[a, b]).reshape(rows, cols, *shape[2:])
            expected[a * rows : (a + 1) * rows, b * cols : (b + 1) * cols] = block
    torch.testing.assert_close(backend.delta(), expected)
    assert backend.block_up.shape[-1] == max(1, min(4, shape[0], shape[1]) // n) or n == 1


@pytest.mark.parametrize("vectors", ["both", "row", "col"])
@pytest.mark.parametrize("kind", LAYERS)
def test_rowcol_delta_is_row_plus_column(kind, vectors):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(RowCol(shape, vectors=vectors))
    row = backend.row if vectors != "col" else torch.zeros(shape[0])
    col = backend.col if vectors != "row" else torch.zeros(shape[1])
    expected = (
        (row.reshape(-1, 1) + col.reshape(1, -1)).reshape(*shape[:2], *[1] * len(shape[2:])).expand(shape)
    )
    torch.testing.assert_close(backend.delta(2.0), 2.0 * expected)


BYPASSING = {
    "lowrank": lambda shape: LowRank(shape, rank=3),
    "tucker": lambda shape: Tucker(shape, rank=3),
    "blockdiag": lambda shape: BlockDiag(shape, blocks=2),
    "blocklowrank": lambda shape: BlockLowRank(shape, rank=4, blocks=2),
}


@pytest.mark.parametrize("backend_name", BYPASSING)
@pytest.mark.parametrize("kind", LAYERS)
def test_bypass_equals_layer_with_delta_weight(backend_name, kind):
    layer = LAYERS[kind]()
    backend = filled(BYPASSING[backend_name](tuple(layer.weight.shape)))
    if not backend.can_bypass(layer):
        # Grouped convs (and reflect padding, blocklowrank's convs) rebuild the weight instead.
        assert layer.groups > 1 or backend_name.startswith("block")
        return
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(1))
    if isinstance(layer, nn.Linear):
        expected = nn.functional.linear(x, backend.delta())
    else:
        expected = layer._conv_forward(x, backend.delta(), None)
    torch.testing.assert_close(backend.bypass(layer, x), expected, rtol=1e-4, atol=1e-4)


def test_zero_initialisation_gives_zero_delta():
    shape = (8, 6, 3, 3)
    weight = torch.randn(shape)
    backends = (
        LowRank(shape, 4),
        Tucker(shape, [4, 4, 2, 2]),
        CP(shape, 4),
        Hadamard(shape, 3, init="loha"),
        Hadamard(shape, 3, init="abba", weight=weight),
        BlockLowRank(shape, 4, blocks=2),
    )
    for backend in backends:
        assert torch.count_nonzero(backend.delta()) == 0
        assert any(torch.count_nonzero(p) > 0 for p in backend.parameters())  # factors are random


def test_ranks_clip_to_mode_sizes_and_lists_need_tucker():
    assert mode_ranks([16, 16, 2, 2], (8, 320, 3, 3)) == [8, 16, 2, 2]
    assert mode_ranks([16, 16, 2], (8, 8, 3, 3, 3)) == [8, 8, 2, 2, 2]
    assert mode_ranks(8, (320, 768)) == [8, 8]
    assert LowRank((4, 2, 1, 1), rank=8).lora_down.shape == (2, 2)
    with pytest.raises(ValueError, match="only apply to the tucker backend"):
        LowRank((8, 6, 3, 3), rank=[4, 4, 2, 2])
    config = AdapterConfig(rank=8, conv_rank=[16, 16, 2, 2], rank_pattern={"to_k": 2})
    assert config.rank_for("mid_block.attentions.0.transformer_blocks.0.attn1.to_k", 2) == 2
    assert config.rank_for("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 2) == 8
    assert config.rank_for("down_blocks.0.resnets.0.conv1", 4) == [16, 16, 2, 2]
    with pytest.raises(ValueError, match="positive integers"):
        AdapterConfig(rank=0)


def test_tensorly_backend_of_the_user_is_untouched():
    tl.set_backend("numpy")
    with tl.backend_context("pytorch"):  # the user's own setting survives our calls inside it
        Tucker((8, 6, 3, 3), 2).delta()
        assert tl.get_backend() == "pytorch"
    Tucker((8, 6, 3, 3), 2).delta()
    CP((8, 6, 3, 3), 2).delta()
    assert tl.get_backend() == "numpy"

    # A thread that never chose a backend follows the global default, also after our calls
    # (tl.backend_context would leave it pinned to the backend it had before).
    computed, changed, seen = threading.Event(), threading.Event(), []

    def worker():
        Tucker((8, 6, 3, 3), 2).delta()
        computed.set()
        changed.wait(10)
        seen.append(tl.get_backend())

    thread = threading.Thread(target=worker)
    thread.start()
    computed.wait(10)
    tl.set_backend("pytorch")  # the user's program changes the global default
    changed.set()
    thread.join()
    tl.set_backend("numpy")
    assert seen == ["pytorch"]


def test_abba_starts_from_the_weights_principal_subspace():
    weight = torch.randn(8, 6, 3, 3)
    backend = Hadamard(tuple(weight.shape), rank=3, init="abba", weight=weight)
    u, s, vh = torch.linalg.svd(weight.reshape(8, -1), full_matrices=False)
    first = backend.hada_w1_a @ backend.hada_w1_b
    torch.testing.assert_close(first, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(backend.hada_w2_a) == 0 and torch.count_nonzero(backend.hada_w2_b) > 0


def test_tuckers_zero_out_start_trains_the_output_factor_from_the_first_step():
    """From FLoRA's zero core only the core gets a gradient at first; from LoRA's start in Tucker form
    (zero output factor, a core with orthonormal mode-0 rows) only the output factor, as LoRA's up."""
    shape, ranks = (8, 6, 3, 3), [4, 4, 2, 2]
    target = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for init, trained in (("zero-core", "tucker_core"), ("zero-out", "tucker_factor.0")):
        backend = Tucker(shape, ranks, init=init)
        assert torch.count_nonzero(backend.delta()) == 0
        (backend.delta() * target).sum().backward()
        assert [name for name, p in backend.named_parameters() if p.grad.abs().sum() > 0] == [trained]
    core = Tucker(shape, ranks, init="zero-out").tucker_core.detach().reshape(4, -1)
    torch.testing.assert_close(core @ core.T, torch.eye(4))
    with pytest.raises(ValueError, match="tucker: unknown init 'loha'"):
        Tucker(shape, ranks, init="loha")
    AdapterConfig(method="liera", init="zero-out")  # its Tucker convolutions take it
    with pytest.raises(ValueError, match="init does not apply to the lowrank backend"):
        AdapterConfig(method="lora", init="zero-out")


def test_block_counts_clip_to_a_common_divisor():
    assert BlockDiag((12, 8), blocks=64).blockdiag_blocks.shape == (4, 3, 2)
    assert BlockDiag((9, 6, 3, 3), blocks=2).blockdiag_blocks.shape == (1, 9, 6, 3, 3)
    assert BlockLowRank((320, 640), rank=8, blocks=2).block_up.shape == (2, 2, 160, 4)
    with pytest.raises(ValueError, match="blocks must be a positive integer"):
        BlockDiag((8, 8), blocks=0)


def test_plain_torch_products_are_tensorlys():
    """Plain-torch copies of TensorLy's products (the rebuilds must compile without graph breaks):
    Tucker's modes 1..N-1 (a Kronecker product of the kernel modes, then the input mode) and CP's
    Khatri-Rao product."""
    from plugin.backends.base import khatri_rao
    from plugin.backends.tucker import _unfolded_without_mode_0
    from plugin.compat import tensorly

    torch.manual_seed(0)
    for shape, ranks in [
        ((6, 5), (3, 2)),
        ((6, 5, 3), (3, 2, 2)),
        ((6, 5, 3, 4), (3, 2, 2, 3)),
        ((4, 3, 2, 3, 2), (2, 3, 1, 2, 2)),
    ]:
        core = torch.randn(ranks)
        factors = [torch.randn(size, rank) for size, rank in zip(shape, ranks)]
        modes = list(range(1, len(shape)))
        expected = tensorly(tl.tenalg.multi_mode_dot, core, factors[1:], modes)
        torch.testing.assert_close(_unfolded_without_mode_0(core, factors), expected.reshape(ranks[0], -1))
    matrices = [torch.randn(n, 6) for n in (3, 4, 2)]
    torch.testing.assert_close(khatri_rao(matrices), tensorly(tl.tenalg.khatri_rao, matrices))
