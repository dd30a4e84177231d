"""setup.py's choices for the CUDA build, without building: where CUTLASS's headers come from and
which architectures are compiled (issue 18). setup.py runs setup() on import, so its functions are
read from its source, as benchmarks/cuda_ptx_check.py does."""
import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_functions(root=ROOT):
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("cutlass_include", "arch_list")]
    namespace = {"__file__": str(root / "setup.py")}
    exec(compile(ast.Module(wanted, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


def fake_headers(folder):
    (folder / "cute").mkdir(parents=True)
    (folder / "cute" / "tensor.hpp").write_text("// fake\n")
    return folder


def test_arch_list_builds_hopper_as_sm90a():
    arch_list = setup_functions()["arch_list"]
    assert arch_list([]) == "8.0;9.0a"  # no visible GPU: what CI's cuda_ptx_check compiles too
    assert arch_list([(9, 0)]) == "9.0a"
    assert arch_list([(8, 0), (9, 0), (9, 0)]) == "8.0;9.0a"
    assert arch_list([(8, 9)]) == "8.9"


def test_cutlass_include_order(tmp_path, monkeypatch):
    """env (alone when set), then the nvidia-cutlass wheel, then the repo's .cutlass/include."""
    find = setup_functions(tmp_path)["cutlass_include"]
    wheel = fake_headers(tmp_path / "site" / "cutlass_library" / "source" / "include")
    local = fake_headers(tmp_path / ".cutlass" / "include")
    env = fake_headers(tmp_path / "env")

    class Spec:
        submodule_search_locations = [str(tmp_path / "site" / "cutlass_library")]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: Spec() if name == "cutlass_library" else real_find_spec(name, *a))
    monkeypatch.delenv("LORA_KERNELS_CUTLASS_INCLUDE", raising=False)
    assert find(str(tmp_path)) == str(wheel)
    monkeypatch.setenv("LORA_KERNELS_CUTLASS_INCLUDE", str(env))
    assert find(str(tmp_path)) == str(env)
    monkeypatch.setenv("LORA_KERNELS_CUTLASS_INCLUDE", str(tmp_path / "missing"))
    assert find(str(tmp_path)) is None, "a wrong LORA_KERNELS_CUTLASS_INCLUDE must not fall back silently"
    monkeypatch.delenv("LORA_KERNELS_CUTLASS_INCLUDE")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # a GPU machine: no wheel
    assert find(str(tmp_path)) == str(local)
    (local / "cute" / "tensor.hpp").unlink()
    assert find(str(tmp_path)) is None
