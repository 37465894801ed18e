"""What is served: network definitions, schedules, checkpoint I/O and the registry layout.

Pure torch + diffusers building blocks; imports nothing else of fewstep but `fewstep.errors`.
"""
