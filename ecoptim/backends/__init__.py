"""The kernels of ``ecoptim.ops``, one package per device (``cpu``); importing a device's ``ops`` module registers
its kernels for the ops."""
