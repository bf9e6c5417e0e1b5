"""Optional dependencies. The graph commands (inspect, apply, diff, bench, passes, serve) need only onnx,
onnxruntime, numpy, typer and rich; export, convert and verify also need the ``[export]`` extra (PyTorch,
transformers, peft, ...), imported lazily inside those commands. A missing extra becomes one line naming
the command and the install command instead of a traceback."""
from __future__ import annotations

DIST = "onnx-graphkit"
# top-level modules the [export] extra provides (pyproject.toml [project.optional-dependencies] export)
EXPORT_MODULES = frozenset({"torch", "transformers", "tokenizers", "peft", "safetensors", "onnxscript", "onnx_ir",
                            "accelerate", "huggingface_hub"})


def missing_extra_message(exc: ModuleNotFoundError, command: str | None) -> str | None:
    """The one-line message for an [export] module that is not installed; None for any other missing module."""
    root = (exc.name or "").split(".")[0]
    if root not in EXPORT_MODULES:
        return None
    what = f"`graphkit {command}`" if command else "this command"
    return (f"{what} needs the [export] extra (PyTorch, transformers, peft; module '{root}' is not installed): "
            f"pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install '{DIST}[export]'")


def require_export(command: str, modules: tuple[str, ...] = ("torch", "transformers", "peft", "onnxscript", "safetensors")) -> None:
    """Fail before any work (and any progress line) when ``command`` needs a module of the [export] extra."""
    import importlib.util

    from graphkit.errors import GraphkitError
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise GraphkitError(missing_extra_message(ModuleNotFoundError(name=name), command))
