"""Built-in forgetting strategies, one module each; every module registers its class on import."""
