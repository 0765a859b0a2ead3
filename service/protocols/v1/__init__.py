"""The ``/v1`` protocol: the service's own JSON and ``.npy``/``.npz`` dialect."""
