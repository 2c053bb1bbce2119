"""The data sets of the evaluation: what `--data` names, how each is loaded, and their file formats.

- [randfeat.eval.data.registry][]: `DATA_SETS` (the `--data` registry), `DataSpec` (the one parser
  of a `--data` value) and `Pool` (the images a run draws from).
- [randfeat.eval.data.loaders][]: the loaders (the embedded digits, Fashion-MNIST, CIFAR-10,
  ImageFolder), `Split`, balanced subsets.
- [randfeat.eval.data.idx][]: IDX files (MNIST's format), read and checked, gzipped or not.

Importing this package loads none of them; import the module you need.
"""
