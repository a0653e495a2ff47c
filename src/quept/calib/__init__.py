"""Calibration: input capture, the block loop with bit sampling and token merging, checkpoints."""

from quept.calib.capture import capture_block_inputs
from quept.calib.checkpoint import (
    CHECKPOINT_DIR,
    CalibCheckpoint,
    CheckpointCorruptError,
    CheckpointMismatchError,
)
from quept.calib.loop import BlockCalibrator, BlockReport, CalibrationError

__all__ = [
    "CHECKPOINT_DIR",
    "BlockCalibrator",
    "BlockReport",
    "CalibCheckpoint",
    "CalibrationError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "capture_block_inputs",
]
