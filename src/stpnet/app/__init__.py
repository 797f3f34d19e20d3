"""The application layer over the library: the ``stpnet`` command line (:mod:`stpnet.app.cli`),
the demo, the train-compress-evaluate pipeline, plots and the progress bar. The library never
imports it."""
