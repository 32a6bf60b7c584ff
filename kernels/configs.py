"""Ahead-of-time resource check of the kernels' GPU launch configurations; needs no GPU.

Each kernel module chooses its launch configuration in one function (``knn_launch_config``,
``retrieve_launch_config``) and enumerates every configuration that function can return on a GPU
(``knn_configs``, ``retrieve_configs``) as :class:`Variant` s. This module compiles a variant for a
GPU target with triton's own compiler and bundled ptxas, and reads the cubin's registers, stack and
local memory (spills) and static shared memory with triton's bundled ``cuobjdump``; the dynamic
shared memory comes from the compiled kernel's metadata. ``bench/kernel_resources.py`` writes the
table, ``tests/test_kernel_resources.py`` asserts it.

What a variant is: the launcher fixes the constexprs and options; triton's JIT then specialises the
runtime arguments by value, and each specialisation is a separately compiled kernel: an integer equal
to 1 becomes a constant, an integer divisible by 16 or a 16-byte-aligned pointer gets a divisibility
hint (vectorised loads). A :class:`Variant` therefore carries representative runtime argument values
and :func:`specialize` applies the JIT's rule to them; the kernel modules enumerate the argument
cases of :func:`arg_cases` (unit inner strides always; D = 1, D divisible by 16 or not; tensors
aligned or at an odd offset). Not modelled: other mixes of these properties (e.g. a set size N
divisible by 16 with D not) and int64 arguments (sets of more than 2**31 elements).

Compilation runs in worker processes without ``TRITON_INTERPRET``: under the interpreter (the CPU
tests set it before importing) ``@triton.jit`` returns interpreted functions, which cannot be
compiled for a GPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

# Per-block shared memory a kernel may use (bytes; static + dynamic, the opt-in maximum): CUDA
# programming guide, compute capabilities 9.0 (227 KB) and 8.0 (163 KB).
SHARED_LIMIT = {90: 232448, 80: 166912}
TARGETS = tuple(SHARED_LIMIT)


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: its element type in triton's notation (``"fp32"``) and whether it is
    16-byte aligned (torch allocations are; a view with an offset may not be)."""

    dtype: str
    aligned: bool = True


@dataclass
class Variant:
    """One compiled kernel a launcher can pick on a GPU.

    ``args`` maps each runtime argument to a representative value (an ``int``, a ``float`` or a
    :class:`Ptr`); ``constexprs`` and ``options`` (``num_warps``, ``num_stages``, ``maxnreg``) are
    what the launcher passes; ``nospec`` names the arguments declared ``do_not_specialize``.
    ``label`` holds what the table shows besides them: dtype, precision and argument case.
    """

    kernel: str  # "knn" / "retrieve"
    module: str  # module holding the @triton.jit function
    fn_name: str
    args: dict
    constexprs: dict
    options: dict
    label: dict
    nospec: tuple = ()

    def specialize(self):
        """``(signature, constexprs, divisible)`` as triton's JIT would compile it for ``args``."""
        return specialize(self.args, self.constexprs, self.nospec)

    def key(self) -> str:
        """Identity of the compiled kernel (two variants with equal keys compile to one cubin)."""
        sig, cx, div = self.specialize()
        return json.dumps([self.module, self.fn_name, sig, cx, sorted(div), self.options], sort_keys=True)

    def to_json(self) -> dict:
        d = asdict(self)
        d["args"] = {k: (asdict(v) | {"ptr": True}) if isinstance(v, Ptr) else v for k, v in self.args.items()}
        return d

    @staticmethod
    def from_json(d: dict) -> "Variant":
        d = dict(d)
        d["args"] = {k: Ptr(v["dtype"], v["aligned"]) if isinstance(v, dict) else v for k, v in d["args"].items()}
        d["nospec"] = tuple(d["nospec"])
        return Variant(**d)


def specialize(args: dict, constexprs: dict, nospec: Iterable[str] = ()):
    """Triton's JIT specialisation of runtime arguments (``native_specialize_impl``): an integer
    equal to 1 is compiled as a constant, an integer divisible by 16 and a 16-byte-aligned pointer
    get ``tt.divisibility=16``; arguments in ``nospec`` are neither. Floats are never specialised.

    Returns ``(signature, constexprs, divisible)``: the signature maps every argument (runtime and
    constexpr) to its type, constant arguments included as ``"constexpr"``.
    """
    nospec = set(nospec)
    sig, cx, div = {}, {}, []
    for name, v in args.items():
        if isinstance(v, Ptr):
            sig[name] = "*" + v.dtype
            if v.aligned:
                div.append(name)
        elif isinstance(v, bool) or not isinstance(v, int):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if name in nospec:
                continue
            if v == 1:
                sig[name], cx[name] = "constexpr", 1
            elif v % 16 == 0:
                div.append(name)
    for name, v in constexprs.items():
        sig[name], cx[name] = "constexpr", v
    return sig, cx, div


def arg_cases(config_of) -> list:
    """``[(config, case, D, aligned)]``: for each distinct launch configuration ``config_of(D)``
    returns, a representative D of each argument case reaching it, and whether the caller's tensors
    are 16-byte aligned: ``D=1`` (a compile-time constant), ``D%16=0`` (divisible: vectorised
    loads), ``D%16!=0`` (no hint on D or the row strides) with aligned tensors (fresh allocations)
    and with tensors at an odd offset (``unaligned``: views). Swept over every D up to 256 and
    around each power of two up to 2**16 (launchers choose D-dependent sizes by powers of two)."""
    ds = sorted(set(range(1, 257)) | {2**j + o for j in range(8, 17) for o in (-1, 0, 1)})
    seen: dict = {}
    for d in ds:
        cfg = config_of(d)
        key = json.dumps(cfg, sort_keys=True)
        if d == 1:
            cases = [("D=1", True)]
        elif d % 16 == 0:
            cases = [("D%16=0", True)]
        else:
            cases = [("D%16!=0", True), ("D%16!=0 unaligned", False)]
        for case, aligned in cases:
            seen.setdefault((key, case), (cfg, case, d, aligned))
    return list(seen.values())


# ------------------------------------------------------------------------------------------------
# tools and parsing


def find_tool(name: str) -> str:
    """Path of an NVIDIA tool triton ships in ``triton/backends/nvidia/bin`` (or the one its
    ``TRITON_<NAME>_PATH`` variable names); raises ``FileNotFoundError`` saying where it looked."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    env = "TRITON_" + name.upper().replace("-", "_") + "_PATH"
    for path in (os.environ.get(env), bundled):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"{name} not found: looked for {bundled} (triton {triton.__version__}'s bundled NVIDIA tools)"
        f"{' and $' + env + '=' + os.environ[env] if os.environ.get(env) else ''}; install a triton wheel "
        f"with its CUDA tools, or point ${env} at one")


def tools_missing() -> Optional[str]:
    """Why the AOT check cannot run here (triton or one of its tools missing), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in TARGETS:
            get_ptxas(arch)  # the ptxas triton compiles this target with (sm_90+: ptxas-blackwell)
    except Exception as exc:
        return f"triton's ptxas is unusable ({exc})"
    try:
        find_tool("cuobjdump")
    except FileNotFoundError as exc:
        return str(exc)
    return None


_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_resource_usage(text: str, fn_name: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> ``{"regs", "stack", "static_shared", "local"}``
    of function ``fn_name``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {fn_name}:" and i + 1 < len(lines):
            got = dict(_USAGE.findall(lines[i + 1]))
            if len(got) == 4:
                return {"regs": int(got["REG"]), "stack": int(got["STACK"]), "local": int(got["LOCAL"]),
                        "static_shared": int(got["SHARED"])}
    raise ValueError(f"no resource usage of {fn_name} in cuobjdump output:\n{text}")


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for ``sm_<arch>``; returns its resources (see :func:`parse_resource_usage`) plus
    ``dynamic_shared`` and ``shared`` (static + dynamic bytes). Call it where ``TRITON_INTERPRET`` was
    unset when the kernel module was imported (see :func:`run_checks`)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(v.module), v.fn_name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{v.module}.{v.fn_name} is a {type(fn).__name__}, not a JITFunction: the module "
                           "was imported with TRITON_INTERPRET set; compile in a process without it")
    sig, cx, div = v.specialize()
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in div}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    with warnings.catch_warnings():
        # FP fusion is left to triton's default, as at a launch; only its 3.9 notice is silenced.
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([find_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    res = parse_resource_usage(out, v.fn_name)
    res["dynamic_shared"] = int(kernel.metadata.shared)
    res["shared"] = res["static_shared"] + res["dynamic_shared"]
    return res


def verdict(res: dict, arch: int) -> str:
    """``"OK"``, ``"SPILL"`` (stack or local memory in use) or ``"SMEM"`` (over the target's limit)."""
    if res["stack"] > 0 or res["local"] > 0:
        return "SPILL"
    if res["shared"] > SHARED_LIMIT[arch]:
        return "SMEM"
    return "OK"


# ------------------------------------------------------------------------------------------------
# enumeration and parallel checking


def all_variants() -> list:
    """Every variant of every kernel, in table order."""
    from .knn import knn_configs
    from .retrieve import retrieve_configs

    return [*knn_configs(), *retrieve_configs()]


@dataclass
class Result:
    """A variant compiled for ``sm_<arch>``: its resources (``{}`` when compilation failed, with the
    ``error``) and ``status``, ``"OK"``/``"SPILL"``/``"SMEM"`` (see :func:`verdict`) or ``"ERROR"``."""

    variant: Variant
    arch: int
    res: dict = field(default_factory=dict)
    status: str = ""
    error: str = ""


def _worker() -> None:
    """Worker process body: JSON ``[[variant, arch], ...]`` on stdin, one JSON result per line out."""
    for v_json, arch in json.load(sys.stdin):
        v = Variant.from_json(v_json)
        try:
            res, err = compile_variant(v, arch), ""
        except Exception as exc:  # reported per variant, so one failure does not hide the others
            res, err = {}, f"{type(exc).__name__}: {exc}"
        print(json.dumps({"res": res, "error": err}), flush=True)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def run_checks(variants: list, archs: Iterable[int] = TARGETS, jobs: Optional[int] = None) -> list:
    """Compile every variant for every arch (each distinct kernel once per arch) in ``jobs`` worker
    processes (default: the CPU count) that never see ``TRITON_INTERPRET``; returns a
    :class:`Result` per (variant, arch), in input order, variants within an arch."""
    archs = list(archs)
    for a in archs:
        if a not in SHARED_LIMIT:
            raise ValueError(f"unknown target sm_{a}; known: {sorted(SHARED_LIMIT)}")
    todo, index = [], {}  # distinct (kernel, arch) -> position in todo
    pairs = [(v, a) for a in archs for v in variants]
    for v, a in pairs:
        index.setdefault((v.key(), a), len(todo))
        if len(todo) < len(index):
            todo.append((v, a))
    jobs = max(1, min(jobs or _cpus(), len(todo)))
    # Slow and fast compilations interleave: worker j takes every jobs-th item.
    chunks = [list(range(j, len(todo), jobs)) for j in range(jobs)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    boot = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            f"from {__name__} import _worker; _worker()")

    def work(chunk):
        payload = json.dumps([[todo[i][0].to_json(), todo[i][1]] for i in chunk])
        p = subprocess.run([sys.executable, "-c", boot, json.dumps(sys.path)], input=payload, env=env,
                           capture_output=True, text=True)
        got = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
        crash = {"res": {}, "error": f"worker exited {p.returncode}: {p.stderr[-2000:]}"}
        return [got[n] if n < len(got) else crash for n in range(len(chunk))]

    outs = [None] * len(todo)
    with ThreadPoolExecutor(jobs) as pool:  # threads only wait on the worker processes
        for chunk, got in zip(chunks, pool.map(work, chunks)):
            for i, o in zip(chunk, got):
                outs[i] = o
    results = []
    for v, a in pairs:
        o = outs[index[(v.key(), a)]]
        r = Result(v, a, o["res"], error=o["error"])
        r.status = verdict(r.res, a) if r.res else "ERROR"
        results.append(r)
    return results
