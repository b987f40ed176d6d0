"""streamadapt/state"""
