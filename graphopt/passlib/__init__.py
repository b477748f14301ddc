"""Libraries shared by several passes: quantize/dequantize representation and
calibration, structured-pruning analysis and recovery, stage partitioning.
Imports the IR and the pass infrastructure, never a backend."""
