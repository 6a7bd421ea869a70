"""torch -> ONNX: the UNet with the SAG attention output, the text encoder and the VAE decoder."""
