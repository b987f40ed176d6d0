"""streamadapt/core"""
