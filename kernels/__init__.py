"""opir's kernels (installed as `opir_kernels`): the inverse operator's PyTorch reference, its
Triton and native C kernels, and the custom op that dispatches between them. The entry point is
`opir_kernels.inverse_operator`; its docstring lists the modules."""
