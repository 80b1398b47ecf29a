"""What the notebooks and commands compute from the mathematics and the pipeline: Azar et al.'s
bandit (``bandits``), JS-IUPO's reachability (``analysis``), the Figure-1 grid (``figure1``)."""
