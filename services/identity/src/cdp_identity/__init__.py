"""The identity service: namespaces, the identity graph, stable profile ids."""
