"""batchnorm.tools"""
