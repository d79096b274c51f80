"""Shared block pools: qcow2 layers in slices of one raw LUN that several
hosts reach (docs/shared-pools.md)."""
