"""LiDAR scene completion: sparse U-Net diffusion model, sampler and pipeline.

The core library imports without ROS, without MinkowskiEngine and without a GPU.
"""

__version__ = "0.1.0"
