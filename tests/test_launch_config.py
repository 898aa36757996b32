"""Launch defaults of :func:`sparseflash._steps.kernel_config` (no GPU needed: the choice
depends only on the device type, head dim, length, dtype and window), and the host's grid arithmetic."""
import pytest
import torch
import triton

from sparseflash import _runtime
from sparseflash._steps import BAND_MAX_WINDOW, BAND_PIPELINED_BWD_MAX_D, DENSE_CUDA_BAND, kernel_config

CUDA = torch.device("cuda")
bf16 = torch.bfloat16


@pytest.mark.parametrize("window", [1, 128, BAND_MAX_WINDOW])
def test_narrow_window_takes_the_band_settings(window):
    cfg = kernel_config(64, CUDA, dense=True, seq_len=16384, dtype=bf16, window=window)
    assert {k: cfg[k] for k in DENSE_CUDA_BAND} == DENSE_CUDA_BAND


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_band_backward_pipeline_follows_the_head_dim(head_dim):
    # Short loops at wide heads: one stage (measured on an H100, see _steps.BAND_PIPELINED_BWD_MAX_D).
    cfg = kernel_config(head_dim, CUDA, dense=True, seq_len=8192, dtype=bf16, window=256)
    assert cfg["bwd_num_stages"] == (1 if head_dim > BAND_PIPELINED_BWD_MAX_D else DENSE_CUDA_BAND["bwd_num_stages"])
    others = {k: v for k, v in DENSE_CUDA_BAND.items() if k != "bwd_num_stages"}
    assert {k: cfg[k] for k in others} == others
    assert kernel_config(head_dim, CUDA, dict(bwd_num_stages=2), dense=True, seq_len=8192, dtype=bf16,
                         window=256)["bwd_num_stages"] == 2


@pytest.mark.parametrize("window", [0, BAND_MAX_WINDOW + 1, 4096])
def test_no_or_wide_window_keeps_the_long_loop_settings(window):
    cfg = kernel_config(64, CUDA, dense=True, seq_len=16384, dtype=bf16, window=window)
    assert (cfg["BLOCK_M"], cfg["num_warps"], cfg["bwd_num_stages"]) == (128, 8, 4)


def test_band_settings_yield_to_kernel_options_and_float32():
    cfg = kernel_config(64, CUDA, dict(BLOCK_M=128, num_warps=8), dense=True, seq_len=16384, dtype=bf16, window=128)
    assert (cfg["BLOCK_M"], cfg["num_warps"], cfg["num_stages"]) == (128, 8, 2)
    f32 = kernel_config(64, CUDA, dense=True, seq_len=16384, dtype=torch.float32, window=128)
    assert f32["num_stages"] == 3  # float32 tiles keep the plain defaults


@pytest.mark.parametrize("head_dim, stages", [(32, 2), (64, 2), (80, 3), (128, 3)])
def test_sparse_forward_pipeline_depth_follows_the_head_dim(head_dim, stages):
    cfg = kernel_config(head_dim, CUDA)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"], cfg["bwd_num_stages"]) == (64, 64, stages, 2)
    assert kernel_config(head_dim, CUDA, dict(num_stages=4))["num_stages"] == 4


def test_cpu_defaults_do_not_change_with_the_window():
    cpu = torch.device("cpu")
    assert kernel_config(64, cpu, dense=True, seq_len=100, dtype=bf16, window=16) == \
        kernel_config(64, cpu, dense=True, seq_len=100, dtype=bf16)


def test_host_tile_arithmetic_matches_triton():
    """The launch code's plain-int ``cdiv`` and ``next_power_of_2`` give triton's answers
    (triton's are constexpr functions, slower to call from the host)."""
    for n in range(1, 1100):
        assert _runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 64, 128):
            assert _runtime.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _runtime.cdiv(0, 64) == 0


def test_hopper_forward_switch():
    """``hopper`` (the dense forward may run sparseflash.hopper's kernel): on by default, off when
    kernel_options set the forward's tiles or launch (so those are what runs), or when asked."""
    assert kernel_config(128, CUDA, dense=True, seq_len=16384, dtype=bf16)["hopper"] == 1
    for opts in (dict(BLOCK_M=64), dict(BLOCK_N=32), dict(num_warps=4), dict(num_stages=2), dict(hopper=0)):
        assert kernel_config(128, CUDA, opts, dense=True, seq_len=16384, dtype=bf16)["hopper"] == 0, opts
    assert kernel_config(128, CUDA, dict(bwd_num_stages=1), dense=True, seq_len=16384, dtype=bf16)["hopper"] == 1
    assert kernel_config(128, CUDA, dict(BLOCK_M=64, hopper=1), dense=True, seq_len=16384, dtype=bf16)["hopper"] == 1
    with pytest.raises(ValueError, match="hopper must be 0 or 1"):
        kernel_config(128, CUDA, dict(hopper=2), dense=True, seq_len=16384, dtype=bf16)
