"""setup.py holds only what pyproject.toml cannot say: the cffi module and the guest build."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

GUEST_DIR = Path(__file__).resolve().parent / "vmm" / "guest"


def build_guest(target_dir: Path) -> None:
    """Assemble the built-in guest with binutils (recipe: vmm/guest/Makefile)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["make", "-C", str(GUEST_DIR), f"OUT={target_dir}"], check=True)


class BuildPyWithGuest(build_py):
    """A wheel's guest.bin is assembled into the build tree, beside the copied package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # nothing is copied; build_ext builds the guest in place
            return
        # build_lib is relative to the project, but make runs in vmm/guest (-C).
        build_guest(Path(self.build_lib).resolve() / "vmm" / "guest")


class BuildExtWithGuest(build_ext):
    """Editable installs run build_ext in place but not build_py: build the guest here too."""

    def run(self) -> None:
        super().run()
        if self.inplace:
            build_guest(GUEST_DIR)


setup(
    cffi_modules=["vmm/_kvm_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuest, "build_ext": BuildExtWithGuest},
)
