"""`google.colab.drive` of the stub Colab (see the package's docstring)."""
import os
from pathlib import Path


def _drive():
    return Path(os.environ["COLAB_STUB_DRIVE"])


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    if os.environ.get("COLAB_STUB_MOUNT_FAILS"):  # what Colab raises when a mount after an unmount fails
        raise ValueError("mount failed")
    point = Path(mountpoint)
    if point.is_symlink() and point.resolve() == _drive().resolve():
        print(f"Drive already mounted at {point}; to attempt to forcibly remount, call "
              "drive.mount(\"/content/drive\", force_remount=True).")
        return
    (_drive() / "MyDrive").mkdir(parents=True, exist_ok=True)
    point.parent.mkdir(parents=True, exist_ok=True)
    if point.is_dir() and not point.is_symlink() and not any(point.iterdir()):
        point.rmdir()  # Colab leaves an empty folder after an unmount
    point.symlink_to(_drive().resolve(), target_is_directory=True)
    print(f"Mounted at {point}")


def flush_and_unmount(timeout_ms=86400000):
    point = Path(os.environ.get("MICROFOSSIL_COLAB_ROOT", "/content")) / "drive"
    with open(_drive().parent / "flushes.log", "a") as log:
        log.write(f"{point}\n")
    if point.is_symlink():
        point.unlink()
        point.mkdir()  # as in Colab: the mount point stays, empty
