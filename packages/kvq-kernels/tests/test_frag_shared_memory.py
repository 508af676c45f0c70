"""The fragment kernel's codes never pass through shared memory as fp16: compiled for sm_90 (no GPU needed), each
default launch allocates shared memory for the cache's integer containers and none for a dequantized fp16 code
tile ([W, BLOCK_N] keys or [BLOCK_N, W] values, W channels a slice).

That is the kernel's whole point (docs/kernel-performance.md): Triton's dot-operand pass moves the layout change
above the unpack only through loads, arithmetic, casts and one-operand pure asm. A change that breaks it (a
two-operand unpack, a shift that depends on the channel, a load the pipeliner cannot copy asynchronously) still
computes the right attention, so no numeric test catches it; the compiled TTGIR does. The compile runs in a
subprocess without TRITON_INTERPRET (under the interpreter `triton.jit` gives no compilable kernel); its
arguments come from `decode_kivi.kernel_call`, as a launch's do.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia", reason="Triton's CUDA backend (ptxas) compiles the kernel")

COMPILE = r"""
import json, re, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvq_kernels.combine import alloc_partials
from kvq_kernels.decode_kivi import (FRAG_CONFIG, FRAG_FEW_CONFIG, FRAG_SHORT_CONFIG, FRAG_SMALL_CONFIG, LaunchPlan,
                                    frag_geometry, kernel_call)
from kvq_kernels.decode_kivi_frag import half_tiles
from kvq_kernels.kivi_layout import allocate

ALLOC = r"ttg\.local_alloc[^\n]*-> !ttg\.memdesc<([0-9x]+)x(\w+),[^\n]*loc\((#loc\d*)\)\n"
FRAG = "decode_kivi_frag.py"


def source(ttgir, loc):  # the file a location comes from: a call site's callee, a named location's own
    text = re.search("^" + loc + r" = (.*)$", ttgir, re.M).group(1)
    path = re.match(r'loc\("([^"]+)":\d+:\d+\)', text)
    if path:
        return path.group(1).rsplit("/", 1)[-1]
    inner = re.search(r"#loc\d*", text)
    return source(ttgir, inner.group(0)) if inner else None
PTR = {torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int16: "*i16",
       torch.int8: "*i8", torch.uint8: "*u8"}
out = []
for bits in (2, 3, 4, 8):
    tables = (FRAG_CONFIG, FRAG_FEW_CONFIG, FRAG_SHORT_CONFIG, FRAG_SMALL_CONFIG)
    configs = list(dict.fromkeys(t[bits] for t in tables if bits in t))
    cache = allocate(1, 8, 128, 4096, bits, 128, 128)
    # GQA 32/8 at every default launch; MHA 8/8 (one query head, padded to the same 8 columns) at the launches of
    # more than FRAG_FEW_ROWS rows
    mha = dict.fromkeys((FRAG_CONFIG[bits], FRAG_SMALL_CONFIG.get(bits, FRAG_CONFIG[bits])))
    for hq, (bn, warps, stages) in [(32, c) for c in configs] + [(8, c) for c in mha]:
        q = torch.zeros(1, hq, 128, dtype=torch.float16)
        plan = LaunchPlan("frag", bn, warps, stages, 4, 1024, 4, 0)
        fn, args, kw = kernel_call(plan, q, cache, 1.0, alloc_partials(hq, 8, 128, "cpu"), True, True)
        opts = {k: kw.pop(k) for k in ("num_warps", "num_stages")}
        names = fn.arg_names
        sig, attrs = {}, {}
        for i, (name, a) in enumerate(zip(names, args)):
            if isinstance(a, torch.Tensor):
                sig[name], attrs[(i,)] = PTR[a.dtype], [["tt.divisibility", 16]]
            elif isinstance(a, float):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        sig.update({k: "constexpr" for k in kw})
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in kw.items()}, attrs=attrs)
        ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ttgir"]
        # only the main loop's allocations: the fp16 tail programs' tiles (decode_kivi_words) may share a code
        # tile's shape ([TAIL_N, head_dim], [HQ_PAD, head_dim])
        allocs = [(shape, dt) for shape, dt, loc in re.findall(ALLOC, ttgir) if source(ttgir, loc) == FRAG]
        w = 128 // (frag_geometry(bits)[1] * half_tiles(bits, 128))  # containers of a slice a row
        out.append(dict(bits=bits, q_heads=hq, config=[bn, warps, stages], w=w, allocs=allocs))
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launches' default; silences Triton 3.9's notice
    r = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _tiles(allocs, dtype_prefix, a, b):
    """Shared-memory tiles of `dtype_prefix` elements shaped [a, b] or [b, a] (a leading pipeline-stage axis aside)."""
    found = []
    for shape, dtype in allocs:
        dims = [int(x) for x in shape.split("x")][-2:]
        if dtype.startswith(dtype_prefix) and sorted(dims) == sorted((a, b)):
            found.append((shape, dtype))
    return found


def test_every_default_fragment_launch_was_compiled(launches):
    got = {(x["bits"], x["q_heads"], tuple(x["config"])) for x in launches}
    assert {b for b, _, _ in got} == {2, 3, 4, 8} and len(got) == 19


def test_no_fp16_code_tile_goes_through_shared_memory(launches):
    for x in launches:
        bn = x["config"][0]
        assert not _tiles(x["allocs"], "f16", x["w"], bn), x
        # the cache's own integer containers are what the copies stage: keys and values, pipelined
        containers = _tiles(x["allocs"], "i", x["w"], bn)
        assert len(containers) >= 2, x
        # 3-bit: each half tile's 2-bit plane bytes and the 1-bit plane's bytes they share, for keys and values
        assert x["bits"] != 3 or len(containers) == 6, x


def test_the_check_sees_an_fp16_code_tile():
    """The pattern finds what a non-hoisted unpack leaves (a TTGIR line of the slow 3-bit variant)."""
    line = "%kt_84 = ttg.local_alloc %42 : (tensor<32x64xf16, #blocked3>) -> !ttg.memdesc<32x64xf16, #shared3, #smem>"
    allocs = re.findall(r"local_alloc[^\n]*-> !ttg\.memdesc<([0-9x]+)x(\w+),", line)
    assert _tiles(allocs, "f16", 32, 64) == [("32x64", "f16")]
