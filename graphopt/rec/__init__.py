"""The recommender side: the model zoo, MovieLens data, fine-tuning, and
resolving a MODEL argument into a Program. Built on the compiler side; the
compiler side never imports it."""
