"""The hypervisor layer: which running VM holds a volume's file, and what
the volume drivers may ask of that VM while it runs (one interface in
base.py; the QMP adapter in qemu.py for qemu processes no libvirt manages)."""
