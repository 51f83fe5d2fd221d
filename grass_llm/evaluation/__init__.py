"""Attribution-quality evaluation: the linear datamodeling score (LDS) on a synthetic corpus."""
