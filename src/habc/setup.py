from glob import glob

from setuptools import find_packages, setup

package_name = 'habc'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        # launch/ and config/ are links to the workspace's top-level folders: one source of
        # truth, installed so that `ros2 launch habc bringup.launch.py` resolves.
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
        ('share/' + package_name + '/config/params', glob('config/params/*.yaml')),
        ('share/' + package_name + '/config/dds', glob('config/dds/*.xml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='habc developers',
    maintainer_email='habc@example.org',
    description='Bringup, launcher and command line of the habc workspace.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'habc = habc.cli:main',
            'doctor = habc.doctor:main',
            'launch = habc.launcher:main',
        ],
    },
)
