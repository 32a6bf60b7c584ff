"""Every GPU launch configuration of the Triton kernels compiles for sm_90 and sm_80 without spilling
registers and within the target's shared memory: compiled ahead of time with triton's bundled ptxas,
read with its cuobjdump; no GPU needed (``bench/kernel_resources.py`` writes the same as a table).

The launch configurations come from the kernels' own enumeration (``knn_configs``/``retrieve_configs``,
derived from the launchers' ``*_launch_config``), so a retuned launcher is checked as it is.
"""
import functools
import json

import pytest
import torch

from conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

KERNELS = ("knn", "retrieve")


def _configs():
    from reta_fast.kernels import configs

    return configs


@pytest.fixture(scope="module")
def results():
    configs = _configs()
    why = configs.tools_missing()
    if why:
        pytest.skip(f"cannot compile ahead of time: {why}")
    # Compiled in worker processes without TRITON_INTERPRET (conftest sets it for the CPU tests),
    # each distinct kernel once per target, all CPUs busy.
    return configs.run_checks(configs.all_variants(), configs.TARGETS)


def _describe(r) -> str:
    v, res = r.variant, r.res
    what = (f"{v.kernel} sm_{r.arch} {v.label} constexprs={v.constexprs} options={v.options}")
    if not res:
        return f"{what}: {r.error}"
    return (f"{what}: {res['regs']} registers, stack {res['stack']} B, local {res['local']} B, shared "
            f"{res['static_shared']}+{res['dynamic_shared']} B (limit {_configs().SHARED_LIMIT[r.arch]})")


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", KERNELS)
def test_no_spills_and_shared_memory_fits(results, kernel, arch):
    mine = [r for r in results if r.variant.kernel == kernel and r.arch == arch]
    assert mine, f"no {kernel} configurations enumerated"
    bad = [r for r in mine if r.status != "OK"]
    assert not bad, f"{len(bad)}/{len(mine)} {kernel} configurations fail on sm_{arch}:\n" + "\n".join(
        f"  {r.status}: {_describe(r)}" for r in bad)


def _key(cfg) -> str:
    return json.dumps([cfg["constexprs"], cfg["options"]], sort_keys=True)


@functools.lru_cache(maxsize=None)
def _enumerated(kernel: str) -> frozenset:
    from reta_fast.kernels import knn, retrieve

    variants = knn.knn_configs() if kernel == "knn" else retrieve.retrieve_configs()
    return frozenset(_key({"constexprs": v.constexprs, "options": v.options}) for v in variants)


@pytest.mark.parametrize("D", [1, 2, 3, 15, 16, 17, 31, 32, 33, 64, 100, 512, 4099])
def test_launchers_pick_only_enumerated_configurations(D):
    from reta_fast.kernels import knn, retrieve

    for k in range(1, 65):
        for precision in ("ieee", "tf32"):
            cfg = knn.knn_launch_config(torch.float32, precision, k, D, interpret=False)
            assert _key(cfg) in _enumerated("knn"), (k, precision, cfg)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                cfg = retrieve.retrieve_launch_config(dtype, dtype, precision, k, D, interpret=False)
                assert _key(cfg) in _enumerated("retrieve"), (k, precision, dtype, cfg)


def test_launchers_reject_what_has_no_compiled_variant():
    from reta_fast.kernels import knn_fwd, retrieve

    for dt in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(ValueError, match=str(dt).replace("torch.", "")):
            knn_fwd(torch.zeros(1, 8, 3, dtype=dt), 2)
    with pytest.raises(ValueError, match="one dtype"):
        retrieve.retrieve_launch_config(torch.bfloat16, torch.float32, "ieee", 4, 16)
