"""A stand-in for Colab's `google.colab` in the tests (put `tests/colab_stub` on PYTHONPATH): `drive.mount` links the
folder `COLAB_STUB_DRIVE` (which holds `MyDrive/`) at the mount point (or raises Colab's `ValueError: mount failed` when `COLAB_STUB_MOUNT_FAILS` is set),
`drive.flush_and_unmount` removes the link and
notes the call in `COLAB_STUB_DRIVE/../flushes.log`; `output.enable_custom_widget_manager` notes its call the same way
(`widget_manager.log`). Nothing else of Colab is imitated."""
