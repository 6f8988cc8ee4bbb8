"""The SUR-adapter: model, feature caches, training, evaluation, inference. Not built yet."""
