"""Auxiliary-objective UPO (Badrinath et al., arXiv 2405.17956), a different method from the
f-divergence UPO of the package's top level that shares its name: a preference loss plus an
advantage-weighted likelihood term for rewards that are not preferences."""
