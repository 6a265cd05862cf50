"""opir's kernels (installed as `opir_kernels`): the inverse operator's PyTorch reference, its
Triton and native C kernels, and the custom op that dispatches between them (the entry point is
`opir_kernels.inverse_operator`; its docstring lists the modules); and the NAFBlock's residual
and LayerNorm over channels with its native C kernel (`opir_kernels.layer_norm`)."""
