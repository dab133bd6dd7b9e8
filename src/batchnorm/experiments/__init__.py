"""batchnorm.experiments"""
