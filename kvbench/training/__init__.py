"""Training code above the policies (LESS kernels: ``kvbench.training.less``)."""
