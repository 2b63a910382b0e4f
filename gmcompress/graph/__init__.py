"""Running the model: calling it on a batch (:mod:`.batches`), the torch.fx pass that finds and swaps the dense
layers (:mod:`.fx`) and the calibration passes that feed the fits (:mod:`.calibration`)."""
