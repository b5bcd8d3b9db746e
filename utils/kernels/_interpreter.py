"""Triton's CPU interpreter (TRITON_INTERPRET=1): whether it is on (the kernels then skip GPU-only features such as
TMA), and a fix that makes it usable with numpy 2 (a loop bound loaded from memory is a one-element array there,
which numpy 2 no longer converts with int(); used by the CPU correctness tests)."""

import os


def interpreting() -> bool:
    """Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fix_interpreter() -> None:
    if not interpreting():
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_dhsa_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._dhsa_patched = True
