"""Import timm and open_clip where torchvision cannot be imported.

Both import torchvision when they are imported (data transforms, ``FrozenBatchNorm2d``), though
the model code the tests build (timm's ViT/DeiT/Swin, open_clip's CLIP towers) never calls it.
PyPI's torchvision for Linux x86_64 is a CUDA build: beside the CPU torch used here its C++ ops
do not load and ``import torchvision`` fails ("operator torchvision::nms does not exist"), and
``pip install timm`` would pull in a torchvision, and with it a newer (CUDA, several GB) torch.
So ``make setup`` installs timm and open-clip-torch with ``--no-deps`` (their pure-Python
dependencies come with the ``test`` extra) and no torchvision, and these tests import them with
an inert stand-in for torchvision present only during that import: every name in it is a
placeholder class, so module-level ``from torchvision.transforms import ...`` lines run. Where a
working torchvision is installed, the real one is used.
"""
import importlib.abc
import importlib.util
import sys
import types

import pytest


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (``InterpolationMode.BICUBIC``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


def _placeholder(name: str) -> type:
    return _Placeholder(name, (), {"__init__": lambda self, *args, **kwargs: None})


class _StandInModule(types.ModuleType):
    __version__ = "0.0+stand-in"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        pass


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # a CUDA build beside a CPU torch raises RuntimeError
        _drop_torchvision()
        return False


def import_without_torchvision(module: str):
    """``pytest.importorskip(module)``, through the torchvision stand-in when needed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (make setup installs it)", allow_module_level=True)
    if module in sys.modules or _torchvision_imports():
        return importlib.import_module(module)
    # open_clip imports transformers when it can; transformers probes for torchvision then and
    # caches the answer, which inside the window below would be "present". Import it first.
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.modeling_utils")
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(module)
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision()  # later importers (transformers) see no torchvision, as before
