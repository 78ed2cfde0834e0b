"""A stand-in for Colab's `google.colab` in the tests (put `tests/colab_stub` on PYTHONPATH): `drive.mount` links the
folder `COLAB_STUB_DRIVE` (which holds `MyDrive/`) at the mount point, `drive.flush_and_unmount` removes the link and
notes the call in `COLAB_STUB_DRIVE/../flushes.log`; `output.enable_custom_widget_manager` notes its call the same way
(`widget_manager.log`). Nothing else of Colab is imitated."""
