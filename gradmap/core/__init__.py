"""Core: model loading, the architecture adapter, layer surgery, checkpoints, calibration data,
process-group primitives, errors and result records. Imports nothing else from gradmap."""
