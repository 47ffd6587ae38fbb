# NVIDIA H200, 132 SMs, bfloat16: bench/tune_decode_attention.py (min_gain 0.03)
TUNED: dict[tuple[int, int, int], TableRows] = {
    (8, 64, 2): (
        (4, KernelConfig(block_n=32, num_warps=8, num_stages=4, waves=2)),
        (128, KernelConfig(block_n=64, num_warps=2, num_stages=3, waves=2)),
        (512, KernelConfig(block_n=64, num_warps=4, num_stages=4, waves=2)),
        (2048, KernelConfig(block_n=64, num_warps=4, num_stages=3, waves=2)),
    ),
    (1, 128, 2): (
        (32, KernelConfig(block_n=32, num_warps=2, num_stages=4, waves=2)),
        (52, KernelConfig(block_n=128, num_warps=4, num_stages=2, waves=4)),
        (1024, KernelConfig(block_n=64, num_warps=4, num_stages=2, waves=2)),
        (1664, KernelConfig(block_n=128, num_warps=4, num_stages=2, waves=2)),
        (4096, KernelConfig(block_n=64, num_warps=4, num_stages=2, waves=2)),
        (6656, KernelConfig(block_n=128, num_warps=4, num_stages=2, waves=2)),
        (16384, KernelConfig(block_n=64, num_warps=4, num_stages=3, waves=2)),
        (26624, KernelConfig(block_n=64, num_warps=4, num_stages=2, waves=2)),
    ),
}
