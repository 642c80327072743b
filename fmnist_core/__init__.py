"""fmnist_core: data, models, training loops, metrics and the experiment runner behind fmnist-book."""

__version__ = "0.1.0"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
