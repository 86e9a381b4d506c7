"""The CPU kernels: ``abi`` (the argument structs, defined once), ``build`` (compile and load the C library of
``ecoptim/csrc``) and ``ops`` (the kernels registered for ``ecoptim.ops``)."""
