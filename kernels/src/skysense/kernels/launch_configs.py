"""Launch configurations of every Triton kernel: one table per kernel, read by the launchers
(``triton_attention``, ``triton_losses``, ``triton_sinkhorn``) and enumerated by the ahead-of-time compile tier
(``aot``, ``tests/kernels/test_gpu_compile.py``), so what CI compiles for sm_80 and sm_90 is
what a card runs.

A table maps the kernel's *class* of problem (the head dim or feature tile rounded up to a
power of two, the operand width in bytes) to a :class:`Launch`: block sizes (constexprs),
``num_warps`` and ``num_stages``. A launcher then only shrinks the row / column blocks to the
problem's lengths (``clamp``: never below 16, the smallest ``tl.dot`` tile), which lowers
registers and shared memory. ``make test`` compiles every table entry at full size for sm_80
and sm_90 with the heaviest flags (two biases with gradients and a padding mask for
attention); the committed table (bench/results/gpu-compile.md, ``aot_report --level full``)
adds the clamped blocks of short sequences, every bias / mask combination, fp16 and TF32.

How the entries were chosen: the largest tiles that neither spill registers nor exceed
sm_80's shared memory on either target with the heaviest flags, head dims 44 (unaligned
strides cost registers) and the power of two it pads to; ptxas's figures per entry are in
bench/results/gpu-compile.md.

Under the Triton interpreter the launchers use few, large blocks (the interpreter pays per
program and per loop step) unless :func:`gpu_blocks` is on: then they take the GPU entries
here, so interpreter tests exercise the masking at the real tile edges.

Pure Python (no torch, no triton import): the tier enumerates the tables without importing
Triton in the test process.
"""

from __future__ import annotations

from dataclasses import dataclass

from skysense.kernels import dispatch

MIN_BLOCK = 16  # smallest tile side of tl.dot
INTERPRETER_BLOCK = 256  # the interpreter's row / column block (few, large programs)
HEAD_DIMS = (16, 32, 64, 128, 256)  # BLOCK_D of the attention kernels (head dims pad up)


@dataclass(frozen=True)
class Launch:
    """One launch configuration: ``blocks`` (constexpr name, value) pairs, warps, stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2
    # Registers per thread ptxas may use; None = its own choice. ptxas caps some of these
    # kernels at 128 registers to raise occupancy and spills instead: 255 lets it take them.
    maxnreg: int | None = None

    @property
    def meta(self) -> dict[str, int]:
        """The block constexprs as keyword arguments."""
        return dict(self.blocks)

    def get(self, name: str) -> int:
        return self.meta[name]

    def with_blocks(self, **blocks: int) -> Launch:
        merged = {**self.meta, **blocks}
        return Launch(tuple(merged.items()), self.num_warps, self.num_stages, self.maxnreg)

    @property
    def label(self) -> str:
        b = "x".join(str(v) for _, v in self.blocks)
        r = f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{b} w{self.num_warps} s{self.num_stages}{r}"


@dataclass
class Call:
    """One kernel launch, ``kernel[grid](*args, **meta)``: ``meta`` holds the constexprs and
    ``num_warps`` / ``num_stages``. The launchers build these and run them; the ahead-of-time
    tier builds the same ones from example tensors and compiles exactly them."""

    name: str  # the kernel's table (a key of ATTENTION or LOSSES)
    kernel: object
    grid: tuple[int, ...]
    args: list
    meta: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)


def call_meta(launch: Launch, **constexprs) -> dict:
    """Constexprs, the launch's blocks, num_warps, num_stages (and maxnreg where the entry
    sets one) as one keyword dict."""
    meta = {
        **constexprs,
        **launch.meta,
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
    }
    if launch.maxnreg:
        meta["maxnreg"] = launch.maxnreg
    return meta


def pow2(x: int) -> int:
    """The next power of two >= x (x >= 1)."""
    return 1 << max(0, int(x) - 1).bit_length()


def clamp(block: int, length: int) -> int:
    """A row / column block shrunk to a problem of ``length`` (>= MIN_BLOCK, power of two)."""
    return max(MIN_BLOCK, min(block, pow2(max(1, length))))


def width(dtype_name: str) -> int:
    """Operand bytes of a dtype name (``float16``, ``bfloat16``, ``float32``)."""
    return 4 if dtype_name == "float32" else 2


def gpu_blocks(enabled: bool = True):
    """Make the launchers use this module's GPU tables under the interpreter too (tests)."""
    return dispatch.set_thread_flag("gpu_blocks", enabled)


def gpu_blocks_forced() -> bool:
    return dispatch.thread_flag("gpu_blocks")


def _L(warps: int, stages: int, maxnreg: int | None = None, **blocks: int) -> Launch:
    return Launch(tuple(blocks.items()), warps, stages, maxnreg)


# --- attention ---------------------------------------------------------------------------------
# (BLOCK_D, operand bytes) -> Launch. Chosen so that no entry spills registers with two biases,
# a padding mask and both bias gradients, and every entry fits sm_80's shared memory (see
# bench/results/gpu-compile.md for registers, shared memory and occupancy).

ATTN_FWD: dict[tuple[int, int], Launch] = {
    (16, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (32, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (64, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (128, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (256, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=32),
    (16, 4): _L(4, 2, BLOCK_M=32, BLOCK_N=32),
    (32, 4): _L(4, 2, BLOCK_M=32, BLOCK_N=32),
    (64, 4): _L(4, 2, BLOCK_M=32, BLOCK_N=32),
    (128, 4): _L(8, 2, BLOCK_M=32, BLOCK_N=32),
    (256, 4): _L(8, 1, BLOCK_M=32, BLOCK_N=32),
}
ATTN_BWD_DKDV: dict[tuple[int, int], Launch] = {
    (16, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (32, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (64, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=32),
    (128, 2): _L(8, 2, BLOCK_M=32, BLOCK_N=64),
    (256, 2): _L(8, 1, BLOCK_M=32, BLOCK_N=32),
    (16, 4): _L(8, 1, 255, BLOCK_M=32, BLOCK_N=32),
    (32, 4): _L(8, 1, 255, BLOCK_M=32, BLOCK_N=32),
    (64, 4): _L(8, 1, 255, BLOCK_M=16, BLOCK_N=32),
    (128, 4): _L(4, 1, BLOCK_M=16, BLOCK_N=32),
    (256, 4): _L(8, 1, BLOCK_M=16, BLOCK_N=32),
}
ATTN_BWD_DQ: dict[tuple[int, int], Launch] = {
    (16, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (32, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=64),
    (64, 2): _L(8, 2, BLOCK_M=64, BLOCK_N=32),
    (128, 2): _L(8, 2, BLOCK_M=32, BLOCK_N=64),
    (256, 2): _L(8, 2, BLOCK_M=32, BLOCK_N=32),
    (16, 4): _L(8, 2, BLOCK_M=32, BLOCK_N=64),
    (32, 4): _L(8, 2, BLOCK_M=32, BLOCK_N=64),
    (64, 4): _L(4, 2, BLOCK_M=32, BLOCK_N=32),
    (128, 4): _L(8, 2, BLOCK_M=32, BLOCK_N=32),
    (256, 4): _L(8, 1, BLOCK_M=16, BLOCK_N=32),
}
ATTENTION = {"attn_fwd": ATTN_FWD, "attn_bwd_dkdv": ATTN_BWD_DKDV, "attn_bwd_dq": ATTN_BWD_DQ}


def head_block(head_dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least 16 (44 -> 64)."""
    return max(MIN_BLOCK, pow2(head_dim))


def attention_launch(kernel: str, head_dim: int, dtype_name: str, nq: int, nk: int) -> Launch:
    """The launch of attention ``kernel`` (``attn_fwd``, ``attn_bwd_dkdv``, ``attn_bwd_dq``) for
    a head dim, an operand dtype name and query / key lengths; BLOCK_D included."""
    base = ATTENTION[kernel][(head_block(head_dim), width(dtype_name))]
    bm, bn = base.get("BLOCK_M"), base.get("BLOCK_N")
    return base.with_blocks(
        BLOCK_M=clamp(bm, nq), BLOCK_N=clamp(bn, nk), BLOCK_D=head_block(head_dim)
    )


# --- losses --------------------------------------------------------------------------------------
# operand bytes -> Launch at full size; the feature tiles BLOCK_D (similarity loop) and BLOCK_DO
# (gradient output tile) shrink to the feature dim, the row / column blocks to the lengths.

NCE_LSE = {
    2: _L(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64),
    4: _L(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_D=32),
}
NCE_GRAD = {
    2: _L(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DO=128),
    4: _L(8, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DO=128),
}
PROTO_FWD = {
    2: _L(4, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_D=64),
    4: _L(4, 3, BLOCK_M=64, BLOCK_K=32, BLOCK_D=32),
}
PROTO_DX = {
    2: _L(8, 2, BLOCK_M=64, BLOCK_K=64, BLOCK_D=64, BLOCK_DO=128),
    4: _L(8, 2, BLOCK_M=64, BLOCK_K=32, BLOCK_D=32, BLOCK_DO=128),
}
PROTO_DW = {
    2: _L(8, 2, BLOCK_M=64, BLOCK_K=64, BLOCK_D=64, BLOCK_DO=128),
    4: _L(4, 2, BLOCK_M=32, BLOCK_K=64, BLOCK_D=32, BLOCK_DO=64),
}
# Sinkhorn reads the scores once per pass, no tl.dot: one entry for every dtype.
SINKHORN = {0: _L(8, 2, BLOCK_N=64, BLOCK_K=128)}
# The row pass gathers each row's group scales, a (BLOCK_N, BLOCK_K) tile more in registers:
# 64 x 128 spilled on sm_80 and sm_90.
SINKHORN_ROWS = {0: _L(8, 2, BLOCK_N=64, BLOCK_K=64)}
LOSSES = {
    "nce_lse": NCE_LSE,
    "nce_grad": NCE_GRAD,
    "proto_fwd": PROTO_FWD,
    "proto_dx": PROTO_DX,
    "proto_dw": PROTO_DW,
    "sk_colsum": SINKHORN,
    "sk_rowsum": SINKHORN_ROWS,
    "sk_write": SINKHORN,
}
# Which lengths each block follows: "rows", "cols" (the other operand's rows, K for the
# prototype kernels) or "d" (the feature dim).
_FOLLOWS = {
    "BLOCK_M": "rows",
    "BLOCK_N": "cols",
    "BLOCK_K": "cols",
    "BLOCK_D": "d",
    "BLOCK_DO": "d",
}
_FOLLOWS_SINKHORN = {"BLOCK_N": "rows", "BLOCK_K": "cols"}  # N samples x K prototypes


def loss_launch(
    kernel: str, dtype_name: str, rows: int, cols: int, d: int = 0, interpreter: bool = False
) -> Launch:
    """The launch of loss ``kernel`` for operands of ``dtype_name``: ``rows`` x ``cols``
    similarities (the Sinkhorn kernels: N samples x K prototypes) over ``d`` features. With
    ``interpreter``, every block starts from 256 instead (4 warps, 1 stage)."""
    table = LOSSES[kernel]
    base = table[0] if 0 in table else table[width(dtype_name)]
    if interpreter:
        base = Launch(tuple((n, INTERPRETER_BLOCK) for n, _ in base.blocks), 4, 1)
    size = {"rows": rows, "cols": cols, "d": d}
    follows = _FOLLOWS_SINKHORN if kernel.startswith("sk_") else _FOLLOWS
    return base.with_blocks(**{n: clamp(v, size[follows[n]]) for n, v in base.blocks})
