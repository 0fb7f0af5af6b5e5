"""Network architectures: the U-Net and Mask R-CNN."""
