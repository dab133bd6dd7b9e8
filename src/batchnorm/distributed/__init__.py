"""batchnorm.distributed"""
